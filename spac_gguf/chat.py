"""Chat prompts: a conversation rendered with the GGUF's own chat template (Jinja, sandboxed, as the
Hugging Face tokenizers render it), ChatML when the file has none."""
from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatError(ValueError):
    """Messages the template cannot render (a bad request, not a server fault)."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML
        self.builtin = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatError(f"the model's chat template does not parse: {e}") from None
        self.special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` ([{role, content}]), ending where the assistant speaks."""
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ChatError(f"messages[{i}].content must be a string")
        if not messages:
            raise ChatError("messages must not be empty")
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except TemplateError as e:
            raise ChatError(f"the chat template rejects these messages: {e}") from None
