"""The built-in model sources, one module each; every module here registers itself."""
