"""Drives m31rd's OpenAI-compatible API with the official `openai` client; run by
openai_client_check.sh. Exits non-zero when an answer has the wrong shape or content."""

import sys

import openai

PREFIX = "pub fn norm(&self) -> f64 {\n    "
SUFFIX = "\n}\n"


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def main(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

    models = client.models.list()
    model = models.data[0].id
    check(len(models.data) == 1 and model.startswith("m31r"), f"models.list -> {model}")

    plain = client.completions.create(model=model, prompt="fn main() {", max_tokens=16)
    choice = plain.choices[0]
    print(f"   text={choice.text!r} finish={choice.finish_reason} usage={plain.usage}")
    check(plain.object == "text_completion" and plain.usage.completion_tokens > 0, "completion")

    fim = client.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=16)
    print(f"   middle={fim.choices[0].text!r} finish={fim.choices[0].finish_reason}")
    check(fim.usage.prompt_tokens > 0, "fill-in-the-middle via suffix")

    pieces, usage = [], None
    stream = client.completions.create(
        model=model, prompt="fn main() {", max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    check("".join(pieces) == choice.text, f"streamed completion equals the whole one ({len(pieces)} chunks)")
    check(usage is not None and usage.completion_tokens == plain.usage.completion_tokens,
          "stream_options.include_usage")

    messages = [
        {"role": "system", "content": "Complete the Rust function."},
        {"role": "user", "content": PREFIX},
    ]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
    reply = chat.choices[0].message
    print(f"   reply={reply.content!r} finish={chat.choices[0].finish_reason}")
    check(chat.object == "chat.completion" and reply.role == "assistant", "chat completion")

    chunks = list(
        client.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True)
    )
    check(all(c.object == "chat.completion.chunk" for c in chunks), f"{len(chunks)} chat chunks")
    check(chunks[0].choices[0].delta.role == "assistant", "the first chunk names the role")
    check(chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason, "finish_reason")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    check(text == reply.content, "streamed chat equals the whole reply")

    try:
        client.completions.create(model=model, prompt="x", max_tokens=100000)
        check(False, "max_tokens out of range is refused")
    except openai.BadRequestError as e:
        print(f"   {e.status_code}: {e.body}")
        check(e.status_code == 400, "an out-of-range parameter raises BadRequestError")

    print("\nall openai client checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
