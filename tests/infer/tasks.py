"""lm-eval task files written by the tests: nothing is downloaded (`dataset_path: json` over a
local jsonl file, found through `--include-path`)."""

# A multiple-choice task over {data}, a jsonl file of {"question", "choices", "answer"} records.
MC_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
