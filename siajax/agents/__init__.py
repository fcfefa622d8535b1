"""Agents: Meta (harness v0), Task (rollouts), Feedback (which lever next), and their LLM backends."""

from siajax.agents.backends import Completion, LocalPolicyBackend, OpenAIBackend
from siajax.agents.evaluation import Evaluation, evaluate
from siajax.agents.feedback import (
    Decision, FeedbackRules, heuristic_decision, llm_decision, summarize, validate_decision,
)
from siajax.agents.meta import initial_harness
from siajax.agents.task_agent import Rollout, final_records, run_items

__all__ = ["Completion", "Decision", "Evaluation", "FeedbackRules", "LocalPolicyBackend", "OpenAIBackend", "Rollout", "evaluate", "final_records",
           "heuristic_decision", "initial_harness", "llm_decision", "run_items", "summarize", "validate_decision"]
