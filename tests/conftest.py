import os

from hypothesis import settings

# Property tests run whole simulations: keep example counts modest so the suite stays fast on 2 cores.
settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from llmsim.schedulers import SCHEDULERS  # noqa: E402
from tests.spf_scheduler import ShortestPromptFirstScheduler  # noqa: E402

SCHEDULERS["spf"] = ShortestPromptFirstScheduler  # a test policy with a non-FCFS admission order
