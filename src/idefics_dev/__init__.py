"""Development tools: the local Cog runner, the schema writer, the tiny model, the model-card recipe. Not in the image."""
