from rankwise.cli import main

raise SystemExit(main())
