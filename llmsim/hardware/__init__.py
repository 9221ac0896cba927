"""Hardware profiles and the roofline operator cost model."""

from llmsim.hardware.profile import HardwareProfile, load_profile

__all__ = ["HardwareProfile", "load_profile"]
