"""`python -m radixserve.bench`, the same as `radixserve bench`."""

from radixserve.bench import main

raise SystemExit(main())
