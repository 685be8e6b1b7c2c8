"""The pipelined search (--jobs, --compile-workers, --cluster): compiles in worker processes or Ray tasks while devices measure."""
