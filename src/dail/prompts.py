"""Every prompt DAIL uses, versioned; the four roles' texts live in a prompt file.

Four contexts, each chat-formatted with the model's own template and ending where the
assistant's turn begins (docs/design.md "The three roles"):

- student:   problem x
- teacher:   problem x + expert solution s (`synth.teacher_context solution`), or problem x + the
             final answer alone (`answer_only`, the authors' ablation)
- negative:  problem x + landmarks s~ (results without the derivation)
- direct:    problem x + s, asking for a self-contained solution in the model's own words
             (direct-mode synthesis: the teacher alone writes)

All four end in the identical assistant header, so a trajectory `r` is the same token ids
after any of them: `r` is appended as ids and never re-tokenized.

Prompt files. The texts of these contexts, and the `instruction` they share, are one YAML file:
dail's own is `prompts.yaml` next to this module (the only home of the built-in texts; read it
for the format and the placeholders). `--prompts FILE.yaml` (`load_prompts`) replaces any of them
and keeps the rest; the file must name its `version`. A `Prompts` holds the resolved texts, their
version and `hash`, the short sha256 of the resolved texts, which every synthesis and evaluation
record carries as `prompt_hash` and the resume checks compare (`dail.config.PROMPT_HASH`).
Training refuses records whose hash differs from its own texts, since it rebuilds the teacher's
and the negative reference's contexts from them. Placeholders are filled in one pass, and only
the names in `PLACEHOLDERS`: other braces, such as LaTeX's `\\boxed{}`, stay as written.

One more context serves a single method, STaR synthesis (`dail synth --mode star`):

- rationalization: the student context + the correct final answer as a hint (Zelikman et al.,
             2022, "rationalization"). Its samples are stored, and trained on, under the plain
             student context: the hint is never part of a training context.

And three serve NuRL (`dail grpo --hints self`, `dail.hints`), under `HINT_PROMPT_VERSION`:
hint_explain / hint_request (the base model explains the gold answer, then writes a short
hint) and hinted (the student context with the hint after the problem; GRPO rollouts only).
Both hinted contexts start with the student context's text, whichever prompt file gave it.

Multiple-choice benchmarks (GPQA-style) put the options under the question in a seeded order,
lettered, followed by `CHOICE_INSTRUCTION` (`choice_problem`); that wording is part of the
problem text of such problems, so it fills the student text's {problem}.

GSM8K calculator annotations (`<<6*2=12>>`) are removed from the solution the teacher sees:
they are a dataset artefact, and a teacher that copies them would pull trajectories away
from how the model writes. (The landmark extractor still reads them from the raw solution.)

Thinking models (`model.thinking auto|on|off`, docs/design.md "Thinking models"). With
thinking on, every context above ends in the assistant header followed by the open think tag
(`<think>\n`), so the trajectory, or an evaluation sample, starts inside the thinking block
(the authors open the assistant turn with the tag in synthesis; dail does it for every
context, so that all of them still end in the same ids). `render` reads the setting from the
tokenizer: `models.load_tokenizer` stores `model.thinking` there (`set_thinking`), so every
role and every stage that loads the model's tokenizer formats its contexts the same way. The setting
maps to the template's `enable_thinking` (Qwen3) where the template reads it; the open tag is
added where the template does not write it itself, and with thinking off a block the template
opened anyway is closed empty, as Qwen3 does for `enable_thinking=False`. With a template that
knows no thinking block, `auto` is off and `render` returns exactly the template's ids.
Evaluation forces an answer out of a sample that reaches its token budget inside the block
with `FORCED_ANSWER_CUE` (versioned by `FORCED_ANSWER_VERSION`).

Versions. A prompt file's `version` (the built-in one's is `PROMPT_VERSION`) covers the texts
above, which every stage renders (training rebuilds them from each record), and is saved with
every output as `prompt_version`, next to `prompt_hash`; change it whenever one of the texts
changes. A prompt that only one method uses has a version of its own, a constant named after
it (`RATIONALIZATION_PROMPT_VERSION`), saved in a field of the same lowercase name in that
method's records and stats. So adding such a prompt, or rewording it, does not touch the prompt
file, and outputs that never used it stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.errors import ConfigError, load_yaml  # a leaf: dail.config imports this module

# ----------------------------------------------------------------------------- prompt files

BUILT_IN_FILE = Path(__file__).with_name("prompts.yaml")

PLACEHOLDERS = ("instruction", "problem", "solution", "answer", "landmarks")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")

# Each text of a prompt file: (placeholders it must hold, those it may hold besides, who reads it).
# A placeholder outside both is refused: it would show a role what it must not see (the student
# the solution) or what its caller does not pass.
TEXTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "instruction": ((), (), "every context, through {instruction}"),
    "student": (("problem",), ("instruction",), "the student, evaluation and GRPO: the problem alone"),
    "teacher": (("problem", "solution"), ("instruction", "answer"), "the teacher: problem + expert solution"),
    "teacher_answer_only": (("problem", "answer"), ("instruction",),
                            "the teacher with teacher_context answer_only: problem + final answer"),
    "negative": (("problem", "landmarks"), ("instruction", "answer"), "the negative reference: problem + landmarks"),
    "direct": (("problem", "solution"), ("instruction", "answer"), "direct-mode synthesis: problem + solution"),
}

TEACHER_CONTEXTS = ("solution", "answer_only")
RECORD_CONTEXTS = TEACHER_CONTEXTS + ("direct",)  # what a synthetic record's teacher_context may say


@dataclass(frozen=True)
class Prompts:
    """The resolved texts of a prompt file (every key of `TEXTS`), its version, where it came from
    ('' = built in) and `hash`, the first 12 hex digits of the sha256 of the texts (not the version)."""
    texts: dict
    version: str
    source: str = ""
    hash: str = ""


def texts_hash(texts: dict) -> str:
    """Short sha256 of the resolved texts: canonical JSON, keys sorted."""
    blob = json.dumps({k: texts[k] for k in sorted(texts)}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _read_prompt_file(path: Path, built_in: bool) -> dict:
    """A prompt file's mapping, checked: known keys only, a version, each text a string with the
    placeholders its role needs and none it must not see. Errors name the file and the key."""
    data = load_yaml(path, "prompt file", f"of prompt texts (version, {', '.join(TEXTS)})")
    for key, value in data.items():
        if key != "version" and key not in TEXTS:
            raise ConfigError(f"{path}: unknown key {key!r} (expected version, {', '.join(TEXTS)})")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: key {key!r}: expected a non-empty string, got {value!r}")
    if "version" not in data:
        raise ConfigError(f"{path}: key 'version' is missing: name this set of texts (it is saved as every "
                          "record's prompt_version), e.g. version: my-prompts-v1")
    missing = [k for k in TEXTS if k not in data]
    if built_in and missing:
        raise ConfigError(f"{path}: the built-in prompt file lacks {', '.join(missing)}")
    for key in (k for k in TEXTS if k in data):
        needs, may, who = TEXTS[key]
        found = set(_PLACEHOLDER.findall(data[key]))
        lacking = [n for n in needs if n not in found]
        if lacking:
            raise ConfigError(f"{path}: key {key!r}: needs the placeholder(s) "
                              f"{', '.join('{' + n + '}' for n in lacking)} ({who})")
        extra = sorted(found - set(needs) - set(may))
        if extra:
            allowed = ", ".join("{" + n + "}" for n in needs + may) or "none"
            raise ConfigError(f"{path}: key {key!r}: placeholder(s) {', '.join('{' + n + '}' for n in extra)} "
                              f"not available here ({who}; available: {allowed})")
    return data


def _built_in() -> Prompts:
    data = _read_prompt_file(BUILT_IN_FILE, built_in=True)
    texts = {k: data[k] for k in TEXTS}
    return Prompts(texts, data["version"], "", texts_hash(texts))


BUILT_IN = _built_in()
PROMPT_VERSION = BUILT_IN.version  # "dail-prompts-v1"

_loaded: dict[tuple[str, int, int], Prompts] = {}


def load_prompts(path: str | Path = "") -> Prompts:
    """The prompts of `path` merged over the built-in ones ('' = the built-in ones).

    A file whose version is the built-in one must hold the built-in texts: another text under
    the same version would make two sets of outputs look alike.
    """
    if not str(path):
        return BUILT_IN
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key in _loaded:
        return _loaded[key]
    data = _read_prompt_file(path, built_in=False)
    texts = BUILT_IN.texts | {k: v for k, v in data.items() if k in TEXTS}
    prompts = Prompts(texts, data["version"], str(path), texts_hash(texts))
    if prompts.version == BUILT_IN.version and prompts.hash != BUILT_IN.hash:
        raise ConfigError(f"{path}: key 'version': {prompts.version!r} is the built-in texts' version, but the texts "
                          "differ; give your file a version of its own")
    if key is not None:
        _loaded[key] = prompts
    return prompts


def _fill(prompts: Prompts | None, key: str, **values: str) -> list[dict]:
    """One user message: text `key` of `prompts` (None = built in) with its placeholders filled,
    in one pass (a value that holds "{problem}" stays as it is)."""
    prompts = prompts or BUILT_IN
    values["instruction"] = prompts.texts["instruction"]
    return [{"role": "user", "content": _PLACEHOLDER.sub(lambda m: values[m.group(1)], prompts.texts[key])}]


def _answer(answer: Any) -> str:
    """The gold answer as shown, "(none)" where there is none (a proof)."""
    text = "" if answer is None else str(answer).strip()
    return text or "(none)"


def clean_solution(solution: str) -> str:
    """The expert solution as shown to the model (calculator annotations removed)."""
    return re.sub(r"<<[^<>]*>>", "", solution).strip()


def student_messages(problem: str, prompts: Prompts | None = None) -> list[dict]:
    return _fill(prompts, "student", problem=problem.strip())


def teacher_messages(problem: str, solution: str, answer: str | None = None,
                     prompts: Prompts | None = None) -> list[dict]:
    return _fill(prompts, "teacher", problem=problem.strip(), solution=clean_solution(solution),
                 answer=_answer(answer))


def answer_only_messages(problem: str, answer: str, prompts: Prompts | None = None) -> list[dict]:
    """The `answer_only` teacher: the problem and its final answer, no solution (the authors' ablation)."""
    return _fill(prompts, "teacher_answer_only", problem=problem.strip(), answer=_answer(answer))


def teacher_context(kind: str, problem: str, solution: str, answer: str | None,
                    prompts: Prompts | None = None) -> list[dict]:
    """The teacher's context of a synthetic record: `synth.teacher_context` `kind` (solution |
    answer_only) for a mixed-mode record, or direct for a direct-mode one, whose trajectory the
    model wrote alone under the `direct` text (tau = 1: one context writes and is the target)."""
    if kind == "direct":
        return direct_messages(problem, solution, answer, prompts)
    if kind == "answer_only":
        return answer_only_messages(problem, answer or "", prompts)
    if kind == "solution":
        return teacher_messages(problem, solution, answer, prompts)
    raise ValueError(f"teacher context: expected {'|'.join(RECORD_CONTEXTS)}, got {kind!r}")


def negative_messages(problem: str, landmarks: list[str], answer: str | None = None,
                      prompts: Prompts | None = None) -> list[dict]:
    return _fill(prompts, "negative", problem=problem.strip(),
                 landmarks="; ".join(landmarks) if landmarks else "(none)", answer=_answer(answer))


def direct_messages(problem: str, solution: str, answer: str | None = None,
                    prompts: Prompts | None = None) -> list[dict]:
    return _fill(prompts, "direct", problem=problem.strip(), solution=clean_solution(solution),
                 answer=_answer(answer))


RATIONALIZATION_PROMPT_VERSION = "dail-rationalization-v1"
RATIONALIZATION_HINT = ("Hint: the correct final answer is {answer}. Work it out step by step as if you were "
                        "solving the problem on your own, arrive at that answer, and do not mention this hint.")


def rationalization_messages(problem: str, answer: str, prompts: Prompts | None = None) -> list[dict]:
    """STaR's rationalization context: the student context with the correct final answer as a hint
    after it.

    The paper shows the answer as a hint inside its few-shot prompt; dail has no few-shot
    prompt, so the answer is stated after the problem instead. The model is asked not to
    mention it because the rationale is trained on after the plain problem, where a reference
    to "the hint" makes no sense.
    """
    (msg,) = student_messages(problem, prompts)
    return [{"role": "user", "content": msg["content"] + "\n\n" + RATIONALIZATION_HINT.format(answer=answer.strip())}]


def render(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of `messages` with the chat template, ending at the assistant header (and, with
    thinking on, the open think tag after it: `thinking_on`)."""
    on = thinking_on(tokenizer)
    source = _template_source(tokenizer)
    kwargs = {"enable_thinking": on} if "enable_thinking" in source else {}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if on or template_thinks(tokenizer):  # a template without a thinking block keeps its ids as they are
        ids += _think_suffix(tokenizer, ids, on)
    return ids


# ----------------------------------------------------------------------------- thinking models

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINKING_SETTINGS = ("auto", "on", "off")

FORCED_ANSWER_VERSION = "dail-forced-answer-v1"
# Appended to a sample cut inside its thinking block: close the block, then cue a boxed answer
# that the grader reads (the forced continuation closes the brace).
FORCED_ANSWER_CUE = "\n" + THINK_CLOSE + "\n\nThe final answer is \\boxed{"


def _template_source(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: any of them counts
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` if it is one token of the vocabulary, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    return tid if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id else None


def template_thinks(tokenizer: Any) -> bool:
    """Whether the chat template knows a thinking block: it reads `enable_thinking` (Qwen3) or
    writes the think tag (e.g. DeepSeek-R1 distills)."""
    source = _template_source(tokenizer)
    return "enable_thinking" in source or THINK_OPEN in source


def _has_tags(tokenizer: Any) -> bool:
    return _token_id(tokenizer, THINK_OPEN) is not None and _token_id(tokenizer, THINK_CLOSE) is not None


def resolve_thinking(tokenizer: Any, setting: str) -> bool:
    """`model.thinking` for this tokenizer: on, off, or auto (on where the template knows a
    thinking block and the tags are tokens of the vocabulary). The closing tag must be one token
    so that synthesis can forbid it and evaluation can find it in the sampled ids."""
    if setting == "off":
        return False
    if setting == "auto":
        return template_thinks(tokenizer) and _has_tags(tokenizer)
    if setting == "on":
        if not _has_tags(tokenizer):
            raise ConfigError(f"config field 'model.thinking': 'on', but the tokenizer has no {THINK_OPEN} and "
                              f"{THINK_CLOSE} tokens (a thinking model's tags); use auto or off")
        return True
    raise ConfigError(f"config field 'model.thinking': expected {'|'.join(THINKING_SETTINGS)}, got {setting!r}")


def set_thinking(tokenizer: Any, setting: str) -> bool:
    """Resolve `setting` for `tokenizer` and store it there, where `render` reads it; returns it."""
    tokenizer.dail_thinking = resolve_thinking(tokenizer, setting)
    return tokenizer.dail_thinking


def thinking_on(tokenizer: Any) -> bool:
    """Whether contexts open a thinking block: the setting `set_thinking` stored on this
    tokenizer, else `auto`."""
    on = getattr(tokenizer, "dail_thinking", None)
    return resolve_thinking(tokenizer, "auto") if on is None else bool(on)


def think_close_ids(tokenizer: Any) -> list[int]:
    """Every token whose text contains the closing tag: the tag itself and any merge that
    carries it. Synthesis bans them all, so no path out of the block is left."""
    return sorted({i for t, i in tokenizer.get_vocab().items() if THINK_CLOSE in t})


def _think_suffix(tokenizer: Any, ids: list[int], on: bool) -> list[int]:
    """Ids to append after the rendered prompt: the open tag when thinking is on and the template
    did not write it; an empty, closed block when thinking is off and the template opened one."""
    opened = tokenizer.decode(ids[-8:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)
    if on == opened:
        return []
    text = THINK_OPEN + "\n" if on else "\n" + THINK_CLOSE + "\n\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant turn with (EOS if it has none of its own)."""
    for name in _END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            return tid
    return tokenizer.eos_token_id


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn when decoding: the template's end-of-turn and EOS."""
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# Multiple choice (GPQA-style benchmarks): the options follow the question, lettered in a seeded order.
CHOICE_INSTRUCTION = "Answer with the letter of the correct option, e.g. \\boxed{A}."
CHOICE_LETTERS = "ABCDEFGHIJ"


def choice_problem(question: str, options: list[str], correct: int, seed: int | str) -> tuple[str, str]:
    """Shuffle `options` with `seed`, letter them, and return (problem text, gold letter).

    `correct` is the index of the right option in `options` (before shuffling).
    """
    if not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise ValueError(f"choice_problem: need 2..{len(CHOICE_LETTERS)} options, got {len(options)}")
    order = list(range(len(options)))
    random.Random(f"dail-choice-{seed}").shuffle(order)
    lines = [f"{CHOICE_LETTERS[j]}) {options[k].strip()}" for j, k in enumerate(order)]
    gold = CHOICE_LETTERS[order.index(correct)]
    text = f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"
    return text, gold


# NuRL hints (`dail grpo --hints self`): collected by the base model from the problem and its gold
# answer, then shown after the problem in training rollouts of all-zero groups (dail.hints).
HINT_PROMPT_VERSION = "dail-nurl-hints-v1"

HINT_EXPLAIN = ("Here is a problem and its correct final answer. Explain step by step how to reach that "
                "answer.\n\nProblem: {problem}\n\nCorrect final answer: {answer}")
HINT_REQUEST = ("Now write one short hint, one or two sentences, for a student who is stuck on this problem. "
                "Point to the key idea or the first step in general terms. Do not state the final answer or "
                "any number that gives it away. Reply with the hint only.")
HINT_LINE = "Hint: {hint}"


def hinted_messages(problem: str, hint: str, prompts: Prompts | None = None) -> list[dict]:
    """The student context with the hint after the problem (training rollouts only). It starts
    with exactly the student context's text, so plain and hinted prompts differ only by the hint."""
    (msg,) = student_messages(problem, prompts)
    return [{"role": "user", "content": msg["content"] + "\n\n" + HINT_LINE.format(hint=hint.strip())}]


def hint_explain_messages(problem: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": HINT_EXPLAIN.format(problem=problem.strip(), answer=answer.strip())}]


def hint_request_messages(problem: str, answer: str, reasoning: str) -> list[dict]:
    return hint_explain_messages(problem, answer) + [{"role": "assistant", "content": reasoning.strip()},
                                                 {"role": "user", "content": HINT_REQUEST}]
