"""The SDK's decisions, without I/O.

Each module here is a plain state machine in the style of websockets'
``Protocol``: feed it what happened (an ack, a batch, a failure, a frame) and
read back what to do (send this batch with this stamp, deliver these events,
wait this long, give up). Nothing here awaits, opens a socket or reads a clock
it was not given, so every rule is tested by feeding inputs and reading
decisions (``tests/client/core/``). The transports and the asyncio drivers in
the package above are the glue.
"""
