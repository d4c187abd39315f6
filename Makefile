.PHONY: course test bench clean
course:  ## execute the notebooks and build the book to _build/html
	bash scripts/course.sh
test:    ## unit tests + nbval on every notebook
	bash scripts/test.sh
bench:   ## every method on 50 CounterFact cases and the lecture cases: the JSON chapter 9 reads
	. scripts/setup.sh && python -m kedit_lite.bench --all --data counterfact --split val --n 50 --json book/results/counterfact_val.json && python -m kedit_lite.bench --all --data lecture --n 20 --seed 0 --no-generation --json book/results/lecture.json
clean:
	rm -rf _build .pytest_cache
