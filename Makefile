.PHONY: course test bench clean
course:  ## execute the notebooks and build the book to _build/html
	bash scripts/course.sh
test:    ## unit tests + nbval on every notebook
	bash scripts/test.sh
bench:   ## the FT baseline on 20 CounterFact cases
	. scripts/setup.sh && python -m kedit_lite.bench --method ft --data counterfact --split val --n 20
clean:
	rm -rf _build .pytest_cache
