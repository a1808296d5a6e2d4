"""``python -m streamlstm.cli``: the same as the ``streamlstm`` command.

Guarded, so a process started by multiprocessing's spawn (which imports the parent's main
module as ``__mp_main__``) does not run the command again.
"""

import sys

from streamlstm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
