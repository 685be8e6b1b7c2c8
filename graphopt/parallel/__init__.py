"""The pipelined search (--jobs, --compile-workers, --cluster): compiles in workers while devices measure."""
