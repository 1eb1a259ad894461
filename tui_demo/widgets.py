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


class UserBubble(Static):
    DEFAULT_CSS = """
    UserBubble {
        margin: 1 0 0 8;
        padding: 0 1;
        background: $primary 15%;
        border-left: thick $primary;
    }
    """

    def __init__(self, message: UserMessage, mine: bool) -> None:
        who = "you" if mine else (message.author.name or message.author.id)
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

    def __init__(self, me: str) -> None:
        super().__init__(id="chat")
        self.me = me
        self.turns: dict[str, TurnView] = {}

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
            await view.mount(UserBubble(event, event.author.id == self.me), before=0)
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
            who = "you" if event.author.id == self.me else (event.author.name or event.author.id)
            await view.mount(Note(f"↳ {who} ({event.mode.value}): {event.text}"))
        elif isinstance(event, Progress):
            await self._progress(event)

    async def _cancel_note(self, cancel: Cancel) -> None:
        who = "you" if cancel.author.id == self.me else (cancel.author.name or cancel.author.id)
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
    """Connection state (with a countdown while reconnecting), offset, who is here."""

    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    connection: reactive[ConnectionStatus | None] = reactive(None)
    position: reactive[str] = reactive("-")
    agents: reactive[str] = reactive("idle")
    people: reactive[str] = reactive("")

    def on_mount(self) -> None:
        self.set_interval(0.25, self.refresh_text)

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
            left = 0.0
            if status.delay is not None:
                left = max(0.0, status.at + status.delay - time.monotonic())
            label = "reconnecting" if state is ConnectionState.RECONNECTING else "offline"
            color = "yellow" if state is ConnectionState.RECONNECTING else "red"
            return Text.assemble((f"◌ {label} in {left:.0f} s (attempt {status.attempt})", color))
        if state is ConnectionState.FAILED:
            return Text.assemble((f"✖ {status}", "bold red"))
        if state is ConnectionState.CLOSED:
            return Text.assemble(("■ closed", "dim"))
        return Text.assemble((f"◌ {state.value}", "yellow"))

    def refresh_text(self) -> None:
        text = self.connection_text()
        text.append(f"  ·  offset {self.position}", style="dim")
        if self.people:
            text.append(f"  ·  here: {self.people}")
        text.append(f"  ·  agent: {self.agents}")
        self.update(text)


def short_offset(offset: str) -> str:
    """``0000000000000000_0000000000001234`` as ``1234`` (offsets are positions here)."""
    tail = offset.rsplit("_", 1)[-1].lstrip("0")
    return tail or "0"
