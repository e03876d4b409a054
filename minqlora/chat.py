"""`--prompt_template chat`: the model folder's own chat template, rendered with Jinja (jinja2).

The instruction becomes the user turn and the prompt ends with the template's generation prompt (the
assistant's header), so the scored/trained output is the assistant's answer; few-shot examples become
earlier user/assistant turns of the same conversation. Rendering follows transformers'
`apply_chat_template` (tokenization_utils_base / utils/chat_template_utils.py): a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, `raise_exception`, the special-token strings as
variables, `add_generation_prompt=True`.

One difference of bookkeeping: minqlora's data and metric code put the BOS id in front of every prompt
themselves (as qlora.py and the course's ppl.py do), so a rendered text that starts with the bos_token
string (Llama-2's "<s>[INST]", SmolLM2's "<|im_start|>system") loses that one leading string here; the ids
are then those of the rendered text (with a byte-level BPE such as SmolLM2's, exactly; with a Llama-2
SentencePiece tokenizer the first piece after BOS gets its "▁" prefix, as in the course's ppl.py, where
apply_chat_template's own tokenization has none). Checked in tests/test_chat.py against transformers. No paper section.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .data import Prompt
from .errors import BadInput
from .config import read_json_object
from .tokenizer import special_token

# What the template is tried on when it is read, so that one failing on every prompt is refused before the
# model loads: one user turn, the shape of every prompt minqlora renders without few-shot examples.
_TRIAL = [{"role": "user", "content": "Hello"}]


class ChatTemplateError(BadInput):
    """A chat template that is missing, is not valid Jinja, or fails while rendering (exit 2)."""


def _read_template(folder: Path) -> tuple[str, dict]:
    """(template, {file: contents} of tokenizer_config.json and special_tokens_map.json) from
    tokenizer_config.json, or chat_template.jinja/.json beside it."""
    files = {name: read_json_object(folder / name) for name in ("tokenizer_config.json", "special_tokens_map.json")}
    template = files["tokenizer_config.json"].get("chat_template")
    if (folder / "chat_template.jinja").exists():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{folder / 'chat_template.jinja'}: cannot read it: not UTF-8 text "
                                    f"({e.reason} at byte {e.start})") from None
    elif (folder / "chat_template.json").exists():
        template = read_json_object(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(f"--prompt_template chat: {folder} has no chat template (tokenizer_config.json's "
                                "chat_template, chat_template.jinja or chat_template.json)")
    return template, files


def _strftime_now(fmt: str) -> str:
    """Today's date in a template (Llama 3.2's system turn), as transformers renders it."""
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: plain JSON (Jinja's own escapes <, >, & and ' for HTML)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatPrompt:
    """Callable like prompts.Prompt: record -> prompt text, via the folder's chat template."""

    name = "chat"
    fields = ("instruction",)
    template = None  # not a format string: course.FewShotPrompt asks for `with_shots` instead

    def __init__(self, folder):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        folder = Path(folder)
        source, files = _read_template(folder)

        def raise_exception(message):
            raise ChatTemplateError(f"{folder}: the chat template refused: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = _strftime_now  # transformers' additions, which templates use
        env.filters["tojson"] = _tojson
        try:
            self.jinja = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{folder}: the chat template is not valid Jinja: {e}") from None
        self.folder = folder
        # as tokenizer.py reads them: tokenizer_config.json's, else special_tokens_map.json's
        self.specials = {f"{k}_token": special_token(folder, k, files) for k in ("bos", "eos", "unk", "pad")}
        self.bos = self.specials["bos_token"] if isinstance(self.specials["bos_token"], str) else ""
        self.render(_TRIAL)

    def render(self, messages: list[dict]) -> str:
        """The conversation as the template writes it, with the generation prompt, less a leading BOS string.
        The template is code from the model folder: any error it raises is refused naming the folder."""
        try:
            text = self.jinja.render(messages=messages, add_generation_prompt=True, **self.specials)
        except ChatTemplateError:
            raise
        except Exception as e:  # UndefinedError, ZeroDivisionError, TypeError, SecurityError, ...
            raise ChatTemplateError(f"{self.folder}: the chat template failed while rendering "
                                    f"({type(e).__name__}: {e})") from None
        return text[len(self.bos):] if self.bos and text.startswith(self.bos) else text

    def messages(self, record: dict, shots=()) -> list[dict]:
        turns = []
        for s in shots:
            turns += [{"role": "user", "content": s["instruction"]}, {"role": "assistant", "content": s["output"]}]
        return turns + [{"role": "user", "content": record["instruction"]}]

    def __call__(self, record: dict) -> str:
        return self.render(self.messages(record))

    def with_shots(self, shots):
        """The prompt with few-shot examples as earlier turns (what course.FewShotPrompt calls)."""
        return lambda record: self.render(self.messages(record, shots))


def prompt_for(template: str, model_dir=None):
    """A prompt by name: 'chat' (needs the model folder) or what data.Prompt takes."""
    if template == "chat":
        if model_dir is None:
            raise ChatTemplateError("--prompt_template chat needs a model folder to read the template from")
        return ChatPrompt(model_dir)
    return Prompt(template)
