from magiclens.cli import main

raise SystemExit(main())
