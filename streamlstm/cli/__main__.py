"""``python -m streamlstm.cli``: the same as the ``streamlstm`` command."""

import sys

from streamlstm.cli.main import main

sys.exit(main())
