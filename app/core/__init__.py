"""The domain core: settings, errors, pricing and money. Imports nothing of the edges or the web."""
