"""Tests of the torch backend (plain torch ops) against the numpy oracle."""
