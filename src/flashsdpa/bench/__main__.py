import sys

from flashsdpa.bench import main

sys.exit(main())
