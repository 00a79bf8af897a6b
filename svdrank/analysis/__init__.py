"""The analysis stage: run the pipeline over every layer, and its versioned file."""
