"""CPU tests of the Triton backend (Triton's interpreter) against the numpy oracle."""
