"""The built-in multitask instruction mixture: the built-in tasks, each asked in several phrasings.

rt-polarity, rt-reviews, bbc-news (answered by the label name) and bbc-headlines (answered by the headline),
each with :data:`PHRASINGS` instructions; each example is phrased by one drawn at random (seeded), from the
tasks' *training* splits only, so no test example is ever trained on. ``builtin:-TASK`` (several, comma
separated) leaves tasks out: instruction-tune on the others, then evaluate zero-shot on the one left out.
Long texts are cut to their first ``max_words`` words so an example fits a short context.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..data.tasks import load_seq2seq_task, load_task
from ..errors import PromptError
from .instructions import Conversation

SENTIMENT = (
    "Is the sentiment of this movie review positive or negative?\n\n{text}",
    "Read the review and answer with one word, positive or negative.\n\n{text}",
    "{text}\n\nDid the reviewer like the film? Answer positive or negative.",
    "Classify the sentiment of the following text as positive or negative.\n\nText: {text}",
    "Movie review: {text}\n\nWhat is the polarity of this review (positive/negative)?",
    "Decide whether the opinion expressed here is positive or negative:\n{text}",
)
TOPIC = (
    "What is the topic of this news article? Choose from business, entertainment, politics, sports, tech.\n\n{text}",
    "{text}\n\nWhich section of a news site does this article belong to: business, entertainment, politics, "
    "sports or tech?",
    "Classify the news article into one of: business, entertainment, politics, sports, tech.\n\nArticle: {text}",
    "Read the article and name its category (business, entertainment, politics, sports or tech).\n{text}",
    "Article: {text}\n\nTopic (business/entertainment/politics/sports/tech):",
    "Is this article about business, entertainment, politics, sports or tech?\n\n{text}",
)
HEADLINE = (
    "Write a headline for this news article.\n\n{text}",
    "{text}\n\nGive this article a short title.",
    "Summarise the following article as a newspaper headline.\n\nArticle: {text}",
    "Article: {text}\n\nHeadline:",
    "What would be a good headline for this story?\n{text}",
)
PHRASINGS: dict[str, tuple[str, ...]] = {"rt-polarity": SENTIMENT, "rt-reviews": SENTIMENT, "bbc-news": TOPIC,
                                         "bbc-headlines": HEADLINE}


def parse_builtin(spec: str) -> list[str]:
    """``builtin`` or ``builtin:-task[,-task]`` -> the tasks of the mixture."""
    head, _, rest = spec.partition(":")
    if head != "builtin":
        raise PromptError(f"{spec!r} is not a built-in mixture: write builtin or builtin:-TASK")
    left_out = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        name = part[1:] if part.startswith("-") else part.removeprefix("minus-")
        if name not in PHRASINGS:
            raise PromptError(f"builtin:{rest}: {name!r} is not a task of the mixture ({', '.join(PHRASINGS)}); "
                              "write builtin:-TASK to leave one out")
        left_out.append(name)
    tasks = [t for t in PHRASINGS if t not in left_out]
    if not tasks:
        raise PromptError(f"{spec!r} leaves no task in the mixture")
    return tasks


def build_mixture(tasks: Sequence[str], per_task: int = 200, seed: int = 0, max_words: int = 150) -> list[Conversation]:
    """``per_task`` training examples of each task, each in a randomly drawn phrasing, shuffled together."""
    rng = random.Random(seed)
    out: list[Conversation] = []
    for name in tasks:
        if name in PHRASINGS and name != "bbc-headlines":
            pool = [(e.text, str(e.label)) for e in load_task(name).split("train")]
        else:
            pool = [(p.source, p.target) for p in load_seq2seq_task(name).split("train")]
        for i, (text, answer) in enumerate(rng.sample(pool, min(per_task, len(pool)))):
            prompt = rng.choice(PHRASINGS[name]).format(text=_cut(text, max_words))
            out.append(Conversation(({"role": "user", "content": prompt}, {"role": "assistant", "content": answer}),
                                    f"{name}#{i}"))
    rng.shuffle(out)
    return out


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."
