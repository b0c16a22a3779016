"""Batch jobs: the OpenAI Batch API's lifecycle, run by `hotswap scheduler` (not to be confused with
the dispatcher's batches, which are groups of queued requests sent to one worker at once).

    files     the Files API catalog (uploaded inputs, written results), tenant-scoped
    records   job records and their state machine in Redis (JobStore)
    lines     validation of an input file, line by line, with the live API's own code
    prepared  the validated requests, kept in object storage in chunks
    runner    the loop: validate, feed the queues, collect, write output.jsonl / errors.jsonl
    output    result and error lines, and the files they are written to
"""
