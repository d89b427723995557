"""Models; importing this registers SOLQ, SOIT and QueryInst in META_ARCH_REGISTRY."""
from . import queryinst, soit, solq  # noqa: F401  (registration)
