"""Closing the loop: annotations come back, the example model is retrained, the new version
is deployed into the running server, and every cycle is recorded and reported."""
