"""The work each command does between parsing and rendering, one module per command.

``bundler.cli`` parses the command line, calls one function here and renders what it
returns; these functions turn the parsed arguments into the core's options (defaults,
environment, the order in which bad input is refused), call the core, and assemble the
result. A command whose work is one core call (``delta``, ``apply``, ``split``, ``recipes``)
calls the core directly; ``demo``'s work is ``bundler.demo.pipeline``.
"""
