module github.com/ztlab/wscount

go 1.22
