"""Development tools, left out of the image."""
