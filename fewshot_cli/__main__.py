"""``python -m fewshot_cli`` is the same as the ``fewshot`` command."""

from fewshot_cli.cli import main

main()
