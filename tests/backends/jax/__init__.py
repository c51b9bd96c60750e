"""Tests of the JAX backend (JAX arrays on the CPU) against the numpy oracle."""
