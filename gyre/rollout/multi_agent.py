"""Multi-agent environments: several agents, each with its own system prompt and session (and, through
episode.Agent, optionally its own engine pool), take turns in one episode; each agent's trajectory is
a sample of its own. Example: a solver answers a math problem, a verifier judges the answer and, while
it says INCORRECT and rounds remain, the solver sees its critique and tries again.

Rewards: the solver gets math_reward of its last answer; the verifier gets 1 for each verdict that
matches the truth of the answer it judged, averaged over its turns.
"""

from __future__ import annotations

import re
from typing import Any

from gyre.rollout.env import Action, Env, Observation, StepResult, chat_prompt
from gyre.rollout.rewards import extract_answer, math_reward

SOLVER_PROMPT = "You solve math problems step by step and put the final answer in \\boxed{}."
VERIFIER_PROMPT = (
    "You check solutions to math problems. Reason briefly, then end with one word: CORRECT or INCORRECT."
)
_VERDICT = re.compile(r"\b(INCORRECT|CORRECT)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """The verifier's last CORRECT / INCORRECT; None if it gave neither."""
    found = _VERDICT.findall(text)
    return None if not found else found[-1].upper() == "CORRECT"


class SolverVerifierEnv(Env):
    agents = ("solver", "verifier")

    def __init__(
        self,
        max_rounds: int = 1,
        solver_prompt: str = SOLVER_PROMPT,
        verifier_prompt: str = VERIFIER_PROMPT,
        max_tokens: int | None = None,
    ) -> None:
        self.max_rounds = max_rounds
        self.solver_prompt = solver_prompt
        self.verifier_prompt = verifier_prompt
        self.max_turns = max_rounds
        self.max_tokens = max_tokens
        self.task: dict[str, Any] = {}
        self.round = 0
        self.answer = ""
        self.verdicts: list[float] = []

    async def reset(self, task: dict[str, Any]) -> Observation:
        self.task, self.round, self.answer, self.verdicts = task, 0, "", []
        return Observation("solver", chat_prompt(task["prompt"], self.solver_prompt))

    async def step(self, agent: str, action: Action) -> StepResult:
        if agent == "solver":
            self.round += 1
            self.answer = action.text
            shown = f"Problem:\n{self.task['prompt']}\n\nProposed solution:\n{action.text}\n\nIs it correct?"
            content = (
                chat_prompt(shown, self.verifier_prompt)
                if self.round == 1
                else [{"role": "user", "content": shown}]
            )
            return StepResult(Observation("verifier", content))
        correct = math_reward(self.answer, self.task) == 1.0
        verdict = parse_verdict(action.text)
        self.verdicts.append(float(verdict is not None and verdict == correct))
        info = {
            "solver_correct": float(correct),
            "answer_found": float(extract_answer(self.answer) is not None),
        }
        if verdict is False and self.round < self.max_rounds:
            critique = f"A verifier judged your solution incorrect:\n{action.text}\n\nTry again."
            return StepResult(Observation("solver", [{"role": "user", "content": critique}]), info=info)
        rewards = {"solver": float(correct), "verifier": sum(self.verdicts) / len(self.verdicts)}
        return StepResult(None, rewards, info)
