"""Thin step tasks: validate the payload, read the inputs from the artifact store, call the model through a
batcher, store the outputs. Model packages are imported inside the calls, so clients import these for free."""
