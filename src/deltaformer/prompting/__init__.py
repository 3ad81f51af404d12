"""Prompt learning on any backbone with an LM head: templates, verbalizers, calibration, demonstrations,
prompt-based fine-tuning (PET) and instruction tuning.

    from deltaformer import prompting
    template = prompting.Template.parse("{text} It was {mask}.")
    verbalizer = prompting.Verbalizer.parse('{"negative": "terrible", "positive": "great"}', task.labels)
    renderer = prompting.PromptRenderer(tokenizer, template, verbalizer, "mlm", max_length=128)
    model = prompting.PromptModel(lm, [prompting.PVP.build(renderer)])
    prompting.evaluate_prompts(model, task.split("test"), calibrate_with=prompting.CONTENT_FREE)

One job per module: ``templates`` (parsing), ``verbalizers``, ``chat`` (chat formats), ``rendering`` (token
rows), ``scoring`` (word and class scores), ``model`` (PVPs as one routed classifier), ``calibration``,
``encoder`` (sentence embeddings), ``demonstrations``, ``evaluation``, ``soft`` (soft tokens as a delta), ``lm`` (loading), ``pet`` (prompt-based
fine-tuning), ``distill`` (PET's ensemble into a classifier).
"""

from __future__ import annotations

from .calibration import CONTENT_FREE, calibrate, content_free_bias
from .chat import PLAIN, ChatFormat
from .demonstrations import STRATEGIES, DemonstrationSelector
from .encoder import SentenceEncoder
from .evaluation import evaluate_prompts, score_rendered
from .model import PVP, PromptModel, PvpCollator, PvpExample
from .pet import PetSpec, PromptSetup, build_prompt_model, load_prompt_run, save_prompt_weights, train_pet
from .rendering import PromptItem, PromptRenderer
from .scoring import PromptCollator, PromptScorer
from .soft import attach_soft_tokens, placeholder_id
from .templates import Template
from .verbalizers import Verbalizer

__all__ = [
    "CONTENT_FREE",
    "PLAIN",
    "PVP",
    "PetSpec",
    "PromptSetup",
    "STRATEGIES",
    "ChatFormat",
    "DemonstrationSelector",
    "PromptCollator",
    "PromptItem",
    "PromptModel",
    "PromptRenderer",
    "PromptScorer",
    "PvpCollator",
    "PvpExample",
    "SentenceEncoder",
    "Template",
    "Verbalizer",
    "attach_soft_tokens",
    "build_prompt_model",
    "load_prompt_run",
    "save_prompt_weights",
    "train_pet",
    "calibrate",
    "content_free_bias",
    "evaluate_prompts",
    "placeholder_id",
    "score_rendered",
]
