"""Render conversations with the checkpoint's own chat template (what vLLM serves), or with
the built-in harmony renderer when there is none.

    renderer = build_renderer(tokenizer_path, template_path="", date="2026-01-31")
    text = renderer.render(messages, tools=None, reasoning_effort="medium")

Where the template comes from, first found: `data.chat_template` (a .jinja file, or a
tokenizer_config.json whose `chat_template` is used), `<tokenizer dir>/chat_template.jinja`,
`<tokenizer dir>/tokenizer_config.json`'s `chat_template` (a string, or the entry named
"default" of a list). Templates run in jinja2's immutable sandbox with the environment HF
transformers gives them (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII), so a template cannot touch files or
mutate its inputs. `strftime_now` formats the run's fixed render date, not the wall clock:
the same data renders to the same tokens on every rank and after a resume.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from runtime.data.chat import harmony


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled, or one that raised on a conversation."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(message)


def _template_from_config(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: cannot read: {e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def find_template(tokenizer_path: str, template_path: str = "") -> tuple[str, str] | None:
    """(template text, where it came from), or None when there is no template."""
    if template_path:
        path = Path(template_path).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"data.chat_template: no such file: {path}")
        if path.suffix == ".json":
            text = _template_from_config(path)
            if text is None:
                raise ChatTemplateError(f"data.chat_template: {path} has no chat_template")
            return text, str(path)
        return path.read_text(encoding="utf-8"), str(path)
    directory = Path(tokenizer_path).expanduser() if tokenizer_path else None
    if directory is None or not directory.is_dir():
        return None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    config = directory / "tokenizer_config.json"
    if config.is_file():
        text = _template_from_config(config)
        if text is not None:
            return text, f"{config} (chat_template)"
    return None


class TemplateRenderer:
    """A chat template compiled once in jinja2's immutable sandbox."""

    def __init__(self, text: str, source: str, *, date: str, special_tokens: dict | None = None):
        # jinja2 is only needed when a template exists (the built-in renderer needs none).
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.date = source, date
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = self._strftime_now
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{source}: invalid chat template: {e}") from None
        self._special = dict(special_tokens or {})

    def _strftime_now(self, fmt: str) -> str:
        return dt.datetime.strptime(self.date, "%Y-%m-%d").strftime(fmt)

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               reasoning_effort: str | None = None, add_generation_prompt: bool = False) -> str:
        import jinja2  # already imported by __init__; the name is needed for the except

        kwargs = dict(self._special)
        if reasoning_effort is not None:  # the template's own default otherwise
            kwargs["reasoning_effort"] = reasoning_effort
        try:
            return self._template.render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
        except (jinja2.TemplateError, TypeError) as e:
            raise ChatTemplateError(f"{self.source}: {e}") from None


class HarmonyRenderer:
    """The built-in harmony renderer behind the same interface."""

    source = "built-in harmony renderer"

    def __init__(self, *, date: str):
        self.date = date

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               reasoning_effort: str | None = None, add_generation_prompt: bool = False) -> str:
        try:
            return harmony.render(messages, tools=tools, date=self.date,
                                  reasoning_effort=reasoning_effort or "medium",
                                  add_generation_prompt=add_generation_prompt)
        except harmony.HarmonyError as e:
            raise ChatTemplateError(str(e)) from None


def today() -> str:
    return dt.date.today().isoformat()


def build_renderer(tokenizer_path: str = "", template_path: str = "", *, date: str = "",
                   special_tokens: dict | None = None):
    """The template renderer when a template is found, else the built-in harmony one.
    `date` (YYYY-MM-DD, default today) is what the system message's `Current date` shows."""
    date = date or today()
    try:
        dt.datetime.strptime(date, "%Y-%m-%d")
    except ValueError:
        raise ChatTemplateError(f"data.chat_date: {date!r} is not YYYY-MM-DD") from None
    found = find_template(tokenizer_path, template_path)
    if found is None:
        return HarmonyRenderer(date=date)
    text, source = found
    return TemplateRenderer(text, source, date=date, special_tokens=special_tokens)
