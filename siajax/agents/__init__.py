"""Agents: Meta (harness v0), Task (rollouts), Feedback (which lever next), the rules they read as data,
the acceptance rule, and their LLM backends."""

from siajax.agents.acceptance import Ruling, Verdict, accept, judge
from siajax.agents.backends import Completion, LocalPolicyBackend, OpenAIBackend
from siajax.agents.decide import Decision, decide
from siajax.agents.evaluation import Evaluation, evaluate
from siajax.agents.feedback import llm_decide, validate_decision
from siajax.agents.meta import initial_harness
from siajax.agents.rules import LEVER_MODES, LEVERS, AcceptanceRule, DecisionRule, EditGrid
from siajax.agents.summary import DevSummary, dev_summary, sample_profile
from siajax.agents.task_agent import Rollout, run_items

__all__ = ["LEVERS", "LEVER_MODES", "AcceptanceRule", "Completion", "Decision", "DecisionRule", "DevSummary",
           "EditGrid", "Evaluation", "LocalPolicyBackend", "OpenAIBackend", "Rollout", "Ruling", "Verdict", "accept",
           "decide", "dev_summary", "evaluate", "initial_harness", "judge", "llm_decide", "run_items",
           "sample_profile", "validate_decision"]
