"""Chat with an RxT model in the terminal: replies stream as they are generated, the memory update runs in the
background after each reply.

    python scripts/chat.py MODEL_DIR                      # in this process (RxTChatSession)
    python scripts/chat.py --url http://127.0.0.1:8000    # against a running `python -m serving` (previous_response_id)

Commands: /reset (a fresh memory), /save FILE and /load FILE (the STM as safetensors; /load needs a local model),
/stats (per-turn latency, time to first token and the STM norm), /quit.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LocalChat:
    """The model in this process: `RxTChatSession` with a background memory update."""

    def __init__(self, model_dir: str, max_new_tokens: int, temperature: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import modeling_rxt  # noqa: F401  (registers the Auto classes)
        from modeling_rxt import RxTChatSession

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.session = RxTChatSession(self.model, self.tokenizer, background_update=True)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def send(self, text: str) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        errors = []

        def run():
            try:
                self.session.interact(text, streamer=streamer, max_new_tokens=self.max_new_tokens, **sampling)
            except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    def reset(self) -> None:
        self.session.reset()

    def save(self, path: str) -> None:
        self.session.save(path)

    def load(self, path: str) -> None:
        from modeling_rxt import RxTChatSession

        self.session = RxTChatSession.load(self.model, self.tokenizer, path, background_update=True)

    def stm_norm(self) -> float:
        return float(self.session.stm.float().norm())


class RemoteChat:
    """A running server: each turn sends only the new message with `previous_response_id`."""

    def __init__(self, url: str, api_key: str | None, max_new_tokens: int, temperature: float):
        import httpx
        from openai import OpenAI

        self.url, self.api_key = url.rstrip("/"), api_key
        self.client = OpenAI(base_url=self.url + "/v1", api_key=api_key or "none")
        self.http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=60)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.previous: str | None = None
        self.conversation: str | None = None

    def send(self, text: str) -> Iterator[str]:
        stream = self.client.responses.create(model="rxt", input=text, previous_response_id=self.previous,
                                              stream=True, max_output_tokens=self.max_new_tokens,
                                              temperature=self.temperature)  # fmt: skip
        for event in stream:
            if event.type == "response.output_text.delta":
                yield event.delta
            elif event.type in ("response.completed", "response.incomplete"):
                self.previous, self.conversation = event.response.id, event.response.conversation.id
            elif event.type == "response.failed":
                raise RuntimeError(f"the server failed the turn: {event.response.error}")

    def reset(self) -> None:
        self.previous = self.conversation = None

    def _memory(self) -> bytes:
        if self.conversation is None:
            raise RuntimeError("no conversation yet: send a message first")
        response = self.http.get(f"{self.url}/v1/conversations/{self.conversation}/memory")
        response.raise_for_status()
        return response.content

    def save(self, path: str) -> None:
        Path(path).write_bytes(self._memory())

    def load(self, path: str) -> None:
        raise RuntimeError("/load needs a local model (python scripts/chat.py MODEL_DIR): the server's memory is "
                           "written only by its own turns")  # fmt: skip

    def stm_norm(self) -> float:
        from safetensors.torch import load

        return float(load(self._memory())["stm"].float().norm())


def run(chat, lines: Iterable[str], out: TextIO = sys.stdout) -> list[dict]:
    """The chat loop over input `lines`, writing to `out`; returns the per-turn stats."""
    stats: list[dict] = []

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        try:
            if command == "/quit":
                break
            if command == "/reset":
                chat.reset()
                say("(memory reset)")
            elif command in ("/save", "/load"):
                if not argument:
                    say(f"usage: {command} FILE")
                    continue
                getattr(chat, command[1:])(argument)
                say(f"({'saved to' if command == '/save' else 'loaded from'} {argument})")
            elif command == "/stats":
                for index, turn in enumerate(stats, 1):
                    say(f"turn {index}: {turn['latency_s'] * 1000:.0f} ms, first token {turn['ttft_s'] * 1000:.0f} ms, "
                        f"{turn['chars']} chars")  # fmt: skip
                say(f"STM norm: {chat.stm_norm():.4f}")
            elif command.startswith("/"):
                say(f"unknown command {command}; commands: /reset /save FILE /load FILE /stats /quit")
            else:
                started, first, chars = time.perf_counter(), None, 0
                for delta in chat.send(line):
                    first = first or time.perf_counter()
                    chars += len(delta)
                    out.write(delta)
                    out.flush()
                done = time.perf_counter()
                say("")
                stats.append({"latency_s": done - started, "ttft_s": (first or done) - started, "chars": chars})
        except Exception as error:  # noqa: BLE001 - a command fails, the chat goes on
            say(f"error: {error}")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", help="RxT checkpoint folder (chat in this process)")
    parser.add_argument("--url", help="base URL of a running server (python -m serving)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)
    if (args.model_dir is None) == (args.url is None):
        parser.error("pass either MODEL_DIR or --url")
    if args.url:
        chat = RemoteChat(args.url, args.api_key, args.max_new_tokens, args.temperature)
    else:
        chat = LocalChat(args.model_dir, args.max_new_tokens, args.temperature)
    print("RxT chat: /reset /save FILE /load FILE /stats /quit")

    def lines():
        while True:
            try:
                yield input("> ")
            except EOFError:
                return

    run(chat, lines())


if __name__ == "__main__":
    main()
