"""The development workbench: the portal stand-in, demo, bench and test data.

Not part of the product: `pip install .` leaves it out (pyproject packages only shared,
services and clave) and no service imports it. Run from the repository root, e.g.
`python -m tools.demo`."""
