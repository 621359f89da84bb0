"""Integrations with serving frameworks. `ray_serve` needs the `loraplex[ray]` extra; importing
this package alone imports nothing from Ray."""
