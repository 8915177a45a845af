"""Robot descriptions and drivers. Imports the standard library and numpy only."""
