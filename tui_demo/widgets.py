"""The chat's widgets. Each owns its CSS; none of them does I/O."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from durable_client import (
    AnyEvent,
    Author,
    Cancel,
    CancelScope,
    ConnectionState,
    ConnectionStatus,
    EndReason,
    Progress,
    ProgressStatus,
    Steer,
    TextDelta,
    TurnEnd,
    TurnStart,
    UserMessage,
)
from durable_client.wire import OFFSET_BEGINNING


class UserBubble(Static):
    DEFAULT_CSS = """
    UserBubble {
        margin: 1 0 0 8;
        padding: 0 1;
        background: $primary 15%;
        border-left: thick $primary;
    }
    """

    def __init__(self, message: UserMessage, who: str) -> None:
        text = Text()
        text.append(f"{who}\n", style="bold")
        text.append(message.text)
        super().__init__(text)


class Note(Static):
    """A one-line note in a turn: a steer, a stop request, a sub-agent's progress."""

    DEFAULT_CSS = """
    Note { margin: 0 0 0 2; color: $text-muted; }
    """


class ReplyView(Vertical):
    """One agent's reply: a header with its status and the Markdown, streamed."""

    DEFAULT_CSS = """
    ReplyView { height: auto; margin: 1 8 0 0; padding: 0 1; border-left: thick $accent; }
    ReplyView > .reply-header { color: $accent; text-style: bold; }
    ReplyView.-stopped { border-left: thick $warning; }
    ReplyView.-stopped > .reply-header { color: $warning; }
    ReplyView.-error { border-left: thick $error; }
    ReplyView.-error > .reply-header { color: $error; }
    ReplyView > Markdown { margin: 0; padding: 0; }
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.author_name = name
        self.text = ""
        self.status = "streaming"
        self._header = Static(classes="reply-header")
        self._markdown = Markdown()
        self._stream: MarkdownStream | None = None
        self._rendered = 0  # characters of self.text already in the Markdown widget

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._markdown

    def on_mount(self) -> None:
        # A reply with no text (a sub-agent that only reports progress) takes no room.
        self.display = bool(self.text)
        self._show_header()

    def _show_header(self) -> None:
        marks = {"streaming": " …", "complete": "", "cancelled": " · stopped", "error": " · error"}
        self._header.update(f"{self.author_name}{marks.get(self.status, '')}")

    async def append(self, text: str, *, live: bool) -> None:
        """Add text. Live text streams into the Markdown; history is rendered once at the end."""
        self.display = True
        if live and self._stream is None:
            await self.catch_up()  # what came as history, rendered before the stream starts
            self._stream = Markdown.get_stream(self._markdown)
        self.text += text
        if self._stream is not None:
            await self._stream.write(text)
            self._rendered = len(self.text)

    async def catch_up(self) -> None:
        """Render text that arrived as history (one update, not one per token)."""
        if self._rendered < len(self.text) and self._stream is None:
            await self._markdown.update(self.text)
            self._rendered = len(self.text)

    async def finish(self, end: TurnEnd, *, live: bool) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if live:
            await self.catch_up()
        self.status = end.reason.value
        if end.reason is not EndReason.COMPLETE:
            self.display = True  # a stopped or failed reply shows even with no text
        if end.reason is EndReason.CANCELLED:
            self.add_class("-stopped")
        elif end.reason is EndReason.ERROR:
            self.add_class("-error")
            if end.error:
                await self.mount(Note(Text(f"error: {end.error}", style="red")))
        self._show_header()


class TurnView(Vertical):
    """A user message and everything around it: replies, steers, progress."""

    DEFAULT_CSS = """
    TurnView { height: auto; }
    """

    def __init__(self, turn_id: str) -> None:
        super().__init__()
        self.turn_id = turn_id
        self.replies: dict[str, ReplyView] = {}
        self.progress: dict[tuple[str, str], Note] = {}

    async def reply(self, author_id: str, name: str) -> ReplyView:
        view = self.replies.get(author_id)
        if view is None:
            view = ReplyView(name)
            self.replies[author_id] = view
            await self.mount(view)
        return view


class ChatLog(VerticalScroll):
    """The conversation, built from session events. Follows the tail unless scrolled up."""

    DEFAULT_CSS = """
    ChatLog { height: 1fr; padding: 0 1; }
    """

    def __init__(self, me: Author) -> None:
        super().__init__(id="chat")
        self.me = me  # this terminal's participant (its name changes on a rename)
        #: Presence labels by participant id (``ada (pts/4)``), kept up to date by the app.
        self.labels: dict[str, str] = {}
        self.turns: dict[str, TurnView] = {}

    def who(self, author: Author) -> str:
        """How this terminal names the author of an event. "you" is only ever this
        terminal's own participant; anyone else goes by their name, and someone with this
        terminal's name (the same person elsewhere) by their terminal's presence label
        (``ada (pts/4)``), else as ``ada in another terminal``."""
        if author.id == self.me.id:
            return "you"
        name = author.name or author.id
        if _reads_as_you(name):
            # "you" was the default name when $USER was unset: here it would mean this terminal.
            return f"another participant ({author.id})"
        if name == self.me.name:
            label = self.labels.get(author.id, "")
            if label and label != name and not _reads_as_you(label):
                return label
            return f"{name} in another terminal"
        return name

    def on_mount(self) -> None:
        self.anchor()

    async def turn(self, turn_id: str) -> TurnView:
        view = self.turns.get(turn_id)
        if view is None:
            view = TurnView(turn_id)
            self.turns[turn_id] = view
            await self.mount(view)
        return view

    async def apply(self, event: AnyEvent, *, live: bool) -> None:
        """Show one event. ``live`` is False while history loads (rendered in one go later)."""
        if isinstance(event, UserMessage):
            view = await self.turn(event.turn_id)
            await view.mount(UserBubble(event, self.who(event.author)), before=0)
        elif isinstance(event, TurnStart):
            view = await self.turn(event.turn_id)
            await view.reply(event.author.id, event.author.name or event.author.id)
        elif isinstance(event, TextDelta):
            view = await self.turn(event.turn_id)
            reply = await view.reply(event.author.id, event.author.name or event.author.id)
            await reply.append(event.text, live=live)
        elif isinstance(event, TurnEnd):
            view = await self.turn(event.turn_id)
            reply = await view.reply(event.author.id, event.author.name or event.author.id)
            await reply.finish(event, live=live)
        elif isinstance(event, Cancel):
            await self._cancel_note(event)
        elif isinstance(event, Steer):
            view = await self.turn(event.turn_id)
            await view.mount(Note(f"↳ {self.who(event.author)} ({event.mode.value}): {event.text}"))
        elif isinstance(event, Progress):
            await self._progress(event)

    async def _cancel_note(self, cancel: Cancel) -> None:
        who = self.who(cancel.author)
        if cancel.scope is CancelScope.TURN and cancel.turn_id is not None:
            view = await self.turn(cancel.turn_id)
            await view.mount(Note(f"■ stop requested by {who}"))
        else:
            await self.mount(Note(f"■ {who} stopped {cancel.scope.value} replies"))

    async def _progress(self, event: Progress) -> None:
        view = await self.turn(event.turn_id)
        key = (event.author.id, event.source)
        marks = {
            ProgressStatus.RUNNING: "⋯",
            ProgressStatus.COMPLETED: "✓",
            ProgressStatus.FAILED: "✗",
            ProgressStatus.STARTED: "⋯",
        }
        name = event.author.name or event.author.id
        bar = ""
        if event.fraction is not None and event.status is ProgressStatus.RUNNING:
            filled = round(event.fraction * 10)
            bar = " [" + "█" * filled + "·" * (10 - filled) + "]"
        line = f"{marks.get(event.status, '·')} {name} · {event.source}: {event.message or ''}{bar}"
        note = view.progress.get(key)
        if note is None:
            note = Note(line)
            view.progress[key] = note
            await view.mount(note)
        else:
            note.update(line)

    async def history_loaded(self) -> None:
        """Render every reply that arrived as history."""
        for view in self.turns.values():
            for reply in view.replies.values():
                await reply.catch_up()


class StatusBar(Static):
    """Connection state (with a countdown while reconnecting), offset, who is here, the agents.

    It fits its width by whole parts, never by cutting a word: first the list of
    people shrinks (``here: ada, bob +2``), then the offset goes, then the people
    become a count (``4 here``, with the offset if it fits), then they go, then the
    ``agent:`` prefix.
    """

    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    connection: reactive[ConnectionStatus | None] = reactive(None)
    position: reactive[str] = reactive("")  # "" while no real offset is known: not shown
    agents: reactive[str] = reactive("idle")
    people: reactive[str] = reactive("")

    def on_mount(self) -> None:
        self.set_interval(0.25, self.refresh_text)

    def on_resize(self) -> None:
        self.refresh_text()

    def watch_connection(self) -> None:
        self.refresh_text()

    def watch_position(self) -> None:
        self.refresh_text()

    def watch_agents(self) -> None:
        self.refresh_text()

    def watch_people(self) -> None:
        self.refresh_text()

    def connection_text(self) -> Text:
        status = self.connection
        if status is None:
            return Text.assemble(("○ starting", "dim"))
        state = status.state
        if state is ConnectionState.CONNECTED:
            return Text.assemble(("● connected", "green"))
        if state in (ConnectionState.RECONNECTING, ConnectionState.OFFLINE):
            left = None
            if status.delay is not None:
                left = max(0.0, status.at + status.delay - time.monotonic())
            label = "reconnecting" if state is ConnectionState.RECONNECTING else "offline, retrying"
            color = "yellow" if state is ConnectionState.RECONNECTING else "red"
            return Text.assemble((f"◌ {label}{_countdown(left)} (attempt {status.attempt})", color))
        if state is ConnectionState.FAILED:
            return Text.assemble((f"✖ {status}", "bold red"))
        if state is ConnectionState.CLOSED:
            return Text.assemble(("■ closed", "dim"))
        return Text.assemble((f"◌ {state.value}", "yellow"))

    def status_text(self, width: int | None = None) -> Text:
        """The bar's text, fitted to ``width`` cells (default: the bar's own width)."""
        if width is None:
            width = self.content_size.width or 10_000  # not laid out yet: everything
        connection = self.connection_text()
        offset = Text(f"offset {self.position}", style="dim") if self.position else None
        names = [n for n in self.people.split(", ") if n] if self.people else []
        agent = self.agents

        def assemble(offset: Text | None, here: str | None, agent_prefix: bool = True) -> Text:
            text = connection.copy()
            for part in (offset, Text(here) if here else None):
                if part is not None:
                    text.append("  ·  ")
                    text.append_text(part)
            text.append(f"  ·  agent: {agent}" if agent_prefix else f"  ·  {agent}")
            return text

        # In order of preference: names before the offset, the offset before a count.
        candidates: list[Text] = []
        for shown in (offset, None):
            for k in range(len(names), 0, -1):
                candidates.append(assemble(shown, _here(names, k)))
        if names:
            candidates.append(assemble(offset, f"{len(names)} here"))
            candidates.append(assemble(None, f"{len(names)} here"))
        candidates.append(assemble(offset, None))
        candidates.append(assemble(None, None))
        candidates.append(assemble(None, None, agent_prefix=False))
        for text in candidates:
            if text.cell_len <= width:
                return text
        return _cut_at_word(connection, width)

    def refresh_text(self) -> None:
        self.update(self.status_text())


def _countdown(left: float | None) -> str:
    """`` in 3 s``, `` in 0.4 s`` under a second, ``…`` while the attempt is under way."""
    if left is None or left < 0.05:
        return "…"
    if left < 1:
        return f" in {left:.1f} s"
    return f" in {left:.0f} s"


def _here(names: list[str], shown: int) -> str | None:
    if not names:
        return None
    more = len(names) - shown
    return "here: " + ", ".join(names[:shown]) + (f" +{more}" if more else "")


def _cut_at_word(text: Text, width: int) -> Text:
    """``text`` in ``width`` cells, cut at a space with an ellipsis, never mid-word."""
    if text.cell_len <= width:
        return text
    plain = text.plain[: max(0, width - 1)]
    cut = plain.rfind(" ")
    head = text[: cut if cut > 0 else len(plain)]
    head.rstrip()
    head.append("…")
    return head


def position_label(offset: str) -> str:
    """How the status bar shows a position's offset: ``1234``, or ``""`` for the
    stream's beginning sentinel (``-1``: no real offset known yet, nothing to show)."""
    if offset == OFFSET_BEGINNING:
        return ""
    return short_offset(offset)


def short_offset(offset: str) -> str:
    """``0000000000000000_0000000000001234`` as ``1234`` (offsets are positions here)."""
    tail = offset.rsplit("_", 1)[-1].lstrip("0")
    return tail or "0"


def _reads_as_you(name: str) -> bool:
    """Whether a name would read as this terminal's user: ``you``, ``You (pts/3)``."""
    words = name.split()
    return bool(words) and words[0].casefold() == "you"
