"""Models: the built-in tokenizer and model, and loading of any policy a recipe names."""
