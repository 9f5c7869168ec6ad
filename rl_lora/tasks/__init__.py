"""Built-in tasks: synthetic problems with exact answers and a fixed held-out split."""
