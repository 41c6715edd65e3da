"""The test suite (a package, so that its helpers import by name in any pytest import mode)."""
