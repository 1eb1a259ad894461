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
    Approval,
    ApprovalRequest,
    ApprovalStatus,
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
    TurnAdopt,
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
        text.append(who, style="bold")
        if message.retry_of is not None:
            text.append("  ↻ asks again (a retry of the reply above)", style="italic")
        text.append("\n")
        text.append(message.text)
        super().__init__(text)


class Note(Static):
    """A one-line note in a turn: a steer, a stop request, a sub-agent's progress."""

    DEFAULT_CSS = """
    Note { margin: 0 0 0 2; color: $text-muted; }
    """


class ApprovalView(Static):
    """An agent's request to run a tool, and how it was decided.

    Pending, it says how to answer (any terminal may); the first answer in the
    log decides (later ones are ignored, as in the SDK's fold); a request
    still pending when its reply ends is void ("no longer needed").
    """

    DEFAULT_CSS = """
    ApprovalView { margin: 0 0 1 0; padding: 0 1; border: round $warning; height: auto; }
    ApprovalView.-approved { border: round $success; }
    ApprovalView.-denied { border: round $error; }
    ApprovalView.-expired { border: round $panel-lighten-2; color: $text-muted; }
    """

    #: How many arguments are shown, and how much of each value.
    MAX_ARGUMENTS = 3
    MAX_VALUE = 60

    def __init__(self, request: ApprovalRequest, asker: str) -> None:
        super().__init__()
        self.request = request
        self.asker = asker
        self.status = ApprovalStatus.PENDING
        #: Who decided, as this terminal names them ("you", "ada").
        self.decided_by: str | None = None
        self.note: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def on_mount(self) -> None:
        self.border_title = "approval"
        self._show()

    def decide(self, decision: Approval, who: str) -> bool:
        """Take ``decision`` (by ``who``) if the request is still pending; True if it decided."""
        if self.status is not ApprovalStatus.PENDING:
            return False
        self.status = ApprovalStatus.APPROVED if decision.approved else ApprovalStatus.DENIED
        self.decided_by = who
        self.note = decision.note
        self.add_class(f"-{self.status.value}")
        self._show()
        return True

    def expire(self) -> None:
        """The reply that asked ended first: nobody needs to answer any more."""
        if self.status is ApprovalStatus.PENDING:
            self.status = ApprovalStatus.EXPIRED
            self.add_class("-expired")
            self._show()

    def approval_text(self) -> Text:
        request = self.request
        marks = {
            ApprovalStatus.PENDING: ("? ", "bold yellow"),
            ApprovalStatus.APPROVED: ("✓ ", "bold green"),
            ApprovalStatus.DENIED: ("✗ ", "bold red"),
            ApprovalStatus.EXPIRED: ("· ", "dim"),
        }
        mark, style = marks[self.status]
        text = Text()
        text.append(mark, style=style)
        text.append(f"{self.asker} asks to run ", style="bold")
        text.append(request.tool, style="bold reverse")
        if request.description:
            text.append(f"\n{request.description}")
        arguments = request.arguments or {}
        for key, value in list(arguments.items())[: self.MAX_ARGUMENTS]:
            shown = value if isinstance(value, str) else repr(value)
            shown = " ".join(shown.split())
            if len(shown) > self.MAX_VALUE:
                shown = shown[: self.MAX_VALUE - 1] + "…"
            text.append(f"\n  {key}: ", style="dim")
            text.append(shown)
        if len(arguments) > self.MAX_ARGUMENTS:
            text.append(f"\n  … {len(arguments) - self.MAX_ARGUMENTS} more", style="dim")
        text.append("\n")
        if self.status is ApprovalStatus.PENDING:
            text.append("Ctrl+Y", style="bold")
            text.append(" approve  ·  ")
            text.append("Ctrl+T", style="bold")
            text.append(" deny  ·  or Ctrl+P: Approve / Deny", style="")
        elif self.status is ApprovalStatus.EXPIRED:
            text.append("no longer needed: the reply ended before anyone answered", style="italic")
        else:
            verb = "approved" if self.status is ApprovalStatus.APPROVED else "denied"
            text.append(f"{verb} by {self.decided_by}", style=style)
            if self.note:
                text.append(f": {self.note}")
        return text

    def _show(self) -> None:
        self.update(self.approval_text())


class ReplyView(Vertical):
    """One agent's reply: a header with its status and the Markdown, streamed.

    The Markdown comes in segments: an approval request closes the segment
    being written, shows its block, and the text after it goes into a new
    segment, so the block stands where the agent asked.
    """

    DEFAULT_CSS = """
    ReplyView { height: auto; margin: 1 8 0 0; padding: 0 1; border-left: thick $accent; }
    ReplyView > .reply-header { color: $accent; text-style: bold; }
    ReplyView.-stopped { border-left: thick $warning; }
    ReplyView.-stopped > .reply-header { color: $warning; }
    ReplyView.-error { border-left: thick $error; }
    ReplyView.-error > .reply-header { color: $error; }
    ReplyView.-abandoned { border-left: dashed $warning; }
    ReplyView.-abandoned > .reply-header { color: $warning; }
    ReplyView > Markdown { margin: 0; padding: 0; }
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.author_name = name
        self.text = ""
        self.status = "streaming"
        #: How many times a new owner took the reply over (a restarted agent host).
        self.adoptions = 0
        self.generation = 0
        self.approvals: list[ApprovalView] = []
        self._header = Static(classes="reply-header")
        self._segments: list[_Segment] = [_Segment(Markdown())]
        self._open_segment = True  # False after an approval block: the next text starts one

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._segments[0].markdown

    def on_mount(self) -> None:
        # A reply with no text (a sub-agent that only reports progress) takes no room.
        self.display = bool(self.text) or bool(self.approvals)
        self._show_header()

    @property
    def done(self) -> bool:
        return self.status != "streaming"

    def header_text(self) -> str:
        marks = {
            "streaming": " …",
            "complete": "",
            "cancelled": " · stopped",
            "error": " · error",
            "abandoned": " · stopped responding",
        }
        header = f"{self.author_name}{marks.get(self.status, '')}"
        if self.adoptions == 1:
            header += " · resumed after a restart"
        elif self.adoptions > 1:
            header += f" · resumed after {self.adoptions} restarts"
        return header

    def _show_header(self) -> None:
        self._header.update(self.header_text())

    async def append(self, text: str, *, live: bool) -> None:
        """Add text. Live text streams into the Markdown; history is rendered once at the end."""
        self.display = True
        if not self._open_segment:
            segment = _Segment(Markdown())
            self._segments.append(segment)
            self._open_segment = True
            await self.mount(segment.markdown)
        segment = self._segments[-1]
        if live and segment.stream is None:
            await segment.catch_up()  # what came as history, rendered before the stream starts
            segment.stream = Markdown.get_stream(segment.markdown)
        self.text += text
        segment.text += text
        if segment.stream is not None:
            await segment.stream.write(text)
            segment.rendered = len(segment.text)

    async def catch_up(self) -> None:
        """Render text that arrived as history (one update, not one per token)."""
        for segment in self._segments:
            await segment.catch_up()

    async def _close_segment(self, *, live: bool) -> None:
        segment = self._segments[-1]
        await segment.stop()
        if live:
            await segment.catch_up()

    async def ask(self, approval: ApprovalView, *, live: bool) -> None:
        """Show an approval request where the reply is now; its text continues below it."""
        self.display = True
        await self._close_segment(live=live)
        self._open_segment = False
        self.approvals.append(approval)
        await self.mount(approval)

    def adopt(self, generation: int) -> None:
        """A new owner took the reply over (generation ``generation``) and continues it."""
        if self.done or generation <= self.generation:
            return
        self.generation = generation
        self.adoptions += 1
        self._show_header()

    async def finish(self, end: TurnEnd, *, live: bool, ended_by: str | None = None) -> None:
        """The reply ended. ``ended_by``: who ended it, when not its own agent."""
        if self.done:
            return  # one end per reply; the fold ignores later ones too
        await self._close_segment(live=live)
        self.status = end.reason.value
        if end.reason is not EndReason.COMPLETE:
            self.display = True  # a stopped or failed reply shows even with no text
        for approval in self.approvals:
            approval.expire()
        if end.reason is EndReason.CANCELLED:
            self.add_class("-stopped")
        elif end.reason is EndReason.ERROR:
            self.add_class("-error")
            line = f"error: {end.error}" if end.error else "error"
            if ended_by:
                line += f" (ended by {ended_by})"
            if end.error or ended_by:
                await self.mount(Note(Text(line, style="red")))
        elif end.reason is EndReason.ABANDONED:
            self.add_class("-abandoned")
            line = "⚠ " + (end.error or "the agent stopped responding")
            if ended_by:
                line += f"; ended by {ended_by}"
            await self.mount(Note(Text(line, style="yellow"), classes="abandoned-note"))
        self._show_header()


class _Segment:
    """One stretch of a reply's Markdown, between approval blocks."""

    def __init__(self, markdown: Markdown) -> None:
        self.markdown = markdown
        self.text = ""
        self.rendered = 0  # characters of self.text already in the Markdown widget
        self.stream: MarkdownStream | None = None

    async def catch_up(self) -> None:
        if self.rendered < len(self.text) and self.stream is None:
            await self.markdown.update(self.text)
            self.rendered = len(self.text)

    async def stop(self) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None


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
        self.approvals: dict[str, ApprovalView] = {}

    async def reply(self, author_id: str, name: str) -> ReplyView:
        view = self.replies.get(author_id)
        if view is None:
            view = ReplyView(name)
            self.replies[author_id] = view
            await self.mount(view)
        return view


class ChatLog(VerticalScroll):
    """The conversation, built from session events. Follows the tail unless scrolled up.

    Under :data:`NARROW` columns it gives the text the room the wide layout
    spends on indenting who said what (``-narrow``).
    """

    DEFAULT_CSS = """
    ChatLog { height: 1fr; padding: 0 1; }
    ChatLog.-narrow { padding: 0; }
    ChatLog.-narrow ReplyView { margin: 1 1 0 0; }
    ChatLog.-narrow UserBubble { margin: 1 0 0 3; }
    """

    #: A terminal narrower than this (in columns) gets the narrow layout.
    NARROW = 80

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

    def on_resize(self) -> None:
        # The terminal's width, not this widget's: the room this class frees must
        # not flip it back, and a scroll bar must not make an 80-column chat narrow.
        self.set_class(self.screen.size.width < self.NARROW, "-narrow")

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
            if event.retry_of is not None:
                await self._retried(event)
        elif isinstance(event, TurnStart):
            view = await self.turn(event.turn_id)
            await view.reply(event.author.id, event.author.name or event.author.id)
        elif isinstance(event, TextDelta):
            view = await self.turn(event.turn_id)
            reply = await view.reply(event.author.id, event.author.name or event.author.id)
            if not reply.done:
                await reply.append(event.text, live=live)
        elif isinstance(event, TurnEnd):
            await self._end(event, live=live)
        elif isinstance(event, TurnAdopt):
            view = await self.turn(event.turn_id)
            reply = await view.reply(event.author.id, event.author.name or event.author.id)
            reply.adopt(event.generation)
        elif isinstance(event, ApprovalRequest):
            await self._ask(event, live=live)
        elif isinstance(event, Approval):
            view = await self.turn(event.turn_id)
            approval = view.approvals.get(event.request_id)
            if approval is not None:
                approval.decide(event, self.who(event.author))
        elif isinstance(event, Cancel):
            await self._cancel_note(event)
        elif isinstance(event, Steer):
            view = await self.turn(event.turn_id)
            await view.mount(Note(f"↳ {self.who(event.author)} ({event.mode.value}): {event.text}"))
        elif isinstance(event, Progress):
            await self._progress(event)

    async def _end(self, end: TurnEnd, *, live: bool) -> None:
        """A reply ended: by its agent, or (abandoned) by whoever noticed it lapsed."""
        view = await self.turn(end.turn_id)
        owner = end.reply_author
        reply = view.replies.get(owner)
        if reply is None:
            name = (end.author.name or owner) if owner == end.author.id else owner
            reply = await view.reply(owner, name)
        ended_by = None if end.author.id == owner else self.who(end.author)
        await reply.finish(end, live=live, ended_by=ended_by)

    async def _ask(self, request: ApprovalRequest, *, live: bool) -> None:
        view = await self.turn(request.turn_id)
        if request.request_id in view.approvals:
            return
        name = request.author.name or request.author.id
        reply = await view.reply(request.author.id, name)
        if reply.done:
            return  # asked after its reply ended: void (the fold ignores it too)
        approval = ApprovalView(request, name)
        view.approvals[request.request_id] = approval
        await reply.ask(approval, live=live)

    async def _retried(self, message: UserMessage) -> None:
        earlier = self.turns.get(message.retry_of or "")
        if earlier is not None:
            await earlier.mount(Note(f"↻ asked again below by {self.who(message.author)}"))

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
