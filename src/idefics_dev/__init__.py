"""Development tools, not the product (the image leaves them out): the local Cog runner (cogrunner.py), the schema
writer (schema.py), the embedded tiny model (tiny.py), the model-card recipe (recipe.py)."""
