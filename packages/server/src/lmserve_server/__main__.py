"""``python -m lmserve_server [FLAGS]`` is ``lmserve serve [FLAGS]`` (KServe's spelling)."""

import sys

from lmserve_server.cli import serve_main

if __name__ == "__main__":
    serve_main(sys.argv[1:], prog="python -m lmserve_server")
