"""Tests of the TVM backend (TE/TensorIR built with TVM, target llvm) against the numpy oracle."""
