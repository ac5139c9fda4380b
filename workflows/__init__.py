"""Concrete graphs, registered through the ``mgmflow.workflows`` entry-point group."""
