"""click CLI: thin commands that parse, call the library, print."""
