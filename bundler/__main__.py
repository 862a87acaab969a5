"""`python -m bundler` runs the CLI."""

from bundler.cli import main

if __name__ == "__main__":
    main()
