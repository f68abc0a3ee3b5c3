#!/bin/bash
echo "pre-launch: ünï"
docker login -u x -p "$TOKEN" registry.example
